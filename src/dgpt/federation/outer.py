"""The outer optimizer: SGD with (Nesterov) momentum on the global parameters, gradient = aggregated Delta.

outer lr 1 with momentum 0 gives Theta <- Theta - mean(Delta) = mean(Theta_j): FedAvg.
"""

from __future__ import annotations

import torch


class OuterOptimizer:
    def __init__(self, theta: torch.Tensor, lr: float, momentum: float, nesterov: bool):
        self.theta = torch.nn.Parameter(theta.detach().clone(), requires_grad=False)
        self.sgd = torch.optim.SGD([self.theta], lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    @torch.no_grad()
    def step(self, delta: torch.Tensor) -> torch.Tensor:
        self.theta.grad = delta.to(self.theta.dtype)
        self.sgd.step()
        self.theta.grad = None
        return self.theta.detach()

    def state_dict(self) -> dict:
        return {"theta": self.theta.detach().cpu(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.sgd.load_state_dict(state["sgd"])
