"""The signed ledger: what an aggregator that rewrites its own ledger (with its own key) cannot hide, what the oracles'
signatures prove, and what each oracle's receipts catch."""

import copy
import json
import os
import shutil

import pytest
from conftest import tiny_config

from dgpt.audit import verify_ledger
from dgpt.cli import main
from dgpt.config import AGGREGATOR
from dgpt.errors import DgptError
from dgpt.federation.ledger import LedgerChain, record_sha256
from dgpt.federation.signing import key_from_pem, new_key, sign_head
from dgpt.fileio import torch_save, write_checksums
from dgpt.rundir import CHECKSUMS, STATE, RunDir, checkpoint_number
from dgpt.runtimes.identity import Witness, keygen
from dgpt.runtimes.sim import pretrain_sim
from dgpt.train.checkpoint import load_state

NAMES = ("alpha", "beta", "gamma")
FED = {"rounds": 3, "inner_steps": 1}


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A 3-round sim run: ledger, signed heads, keys and every oracle's receipts."""
    config = tiny_config(tmp_path_factory.mktemp("honest"), federation=FED)
    pretrain_sim(config)
    return config


@pytest.fixture
def run(honest, tmp_path):
    """A copy of the honest run to forge."""
    shutil.copytree(honest.run_dir, tmp_path / "run")
    return RunDir(tmp_path / "run")


def receipts(run: RunDir, name: str) -> str:
    return str(run.receipts(name))


def forge(run: RunDir, edit) -> None:
    """What the aggregator can do alone: edit its records, re-link them, re-sign their heads with its key and
    re-anchor its round checkpoints (a checkpoint of a removed record goes too)."""
    records = [json.loads(line) for line in run.ledger.read_text().splitlines()]
    edit(records)
    chain, key = LedgerChain(), key_from_pem(run.private_key(AGGREGATOR).read_bytes())
    lines = [chain.link({k: v for k, v in r.items() if k != "prev"}) for r in records]
    genesis = record_sha256(lines[0])
    heads = [sign_head(key, json.loads(line)["round"], record_sha256(line), json.loads(line)["prev"], genesis) for line in lines]
    run.ledger.write_text("".join(line + "\n" for line in lines))
    run.ledger_heads.write_text("".join(json.dumps(h) + "\n" for h in heads))
    by_round = {json.loads(line)["round"]: line for line in lines}
    for checkpoint in run.list_checkpoints():
        if checkpoint_number(checkpoint) not in by_round:
            shutil.rmtree(checkpoint)
            continue
        state = load_state(checkpoint)
        state["ledger_head"] = record_sha256(by_round[checkpoint_number(checkpoint)])
        torch_save(state, checkpoint / STATE)
        write_checksums(checkpoint, CHECKSUMS)


def move_value(records):
    """alpha's value credited to beta in every round."""
    for record in records[1:]:
        alpha, beta = record["oracles"]["alpha"], record["oracles"]["beta"]
        beta["value"], alpha["value"] = beta["value"] + alpha["value"], 0.0


def test_an_honest_run_verifies_with_every_oracles_receipts_and_keys(honest, capsys):
    run = RunDir(honest.run_dir)
    assert main(["ledger", str(run.root), "--receipts", *(receipts(run, n) for n in NAMES), "--keys", str(run.keys)]) == 0
    out = capsys.readouterr().out
    assert "every signature, statement and value holds" in out and "keys as in" in out
    assert all(f"receipts of '{n}' confirm rounds 0-3" in out for n in NAMES)
    assert os.stat(run.private_key("alpha")).st_mode & 0o777 == 0o600


def test_a_moved_value_is_caught_by_the_signed_losses_and_by_any_single_oracles_receipts(run, capsys):
    forge(run, move_value)
    assert main(["ledger", str(run.root)]) == 2  # the values no longer follow from what the oracles signed
    assert "round 1: oracle 'alpha': its value 0.0 does not follow from the signed losses" in capsys.readouterr().err
    for name in NAMES:  # and every oracle's receipts show that round 1 is not the record it was given
        assert main(["ledger", str(run.root), "--receipts", receipts(run, name)]) == 2
        assert f"oracle '{name}': round 1: the ledger's record is not the one" in capsys.readouterr().err


def test_an_altered_statement_fails_its_signature(run):
    def more_tokens(records):
        statement = records[2]["oracles"]["beta"]["statement"]
        body = json.loads(statement["body"])
        statement["body"] = json.dumps({**body, "tokens": body["tokens"] * 2}, sort_keys=True, separators=(",", ":"))
        records[2]["oracles"]["beta"]["tokens"] *= 2

    forge(run, more_tokens)
    with pytest.raises(DgptError, match="round 2: oracle 'beta': its statement: its signature does not verify"):
        verify_ledger(run.root)


def test_a_removed_last_record_is_caught_by_receipts(run):
    forge(run, lambda records: records.pop())
    assert verify_ledger(run.root).rounds == 2  # consistent by itself
    with pytest.raises(DgptError, match="oracle 'gamma': round 3: the ledger has no record of this round"):
        verify_ledger(run.root, [run.receipts("gamma")])


def test_keys_other_than_the_genesis_names_are_caught(run, tmp_path):
    keygen(tmp_path / "mine", "beta")
    with pytest.raises(DgptError, match="the genesis names another key for beta"):
        verify_ledger(run.root, keys_dir=tmp_path / "mine")


def test_an_oracle_given_a_forked_head_stops(run, honest):
    forge(run, move_value)
    config = tiny_config(run.root.parent, federation={**FED, "rounds": 4})
    with pytest.raises(DgptError, match=r"oracle 'alpha': round 3: the head of round 3 is not the one this oracle holds"):
        pretrain_sim(config)
    key = new_key()
    witness = Witness("alpha", new_key(), run.root / "w.jsonl", key.public_key().public_bytes_raw().hex())
    witness.receive(sign_head(key, 0, "a" * 64, "0" * 64, "a" * 64))
    witness.receive(sign_head(key, 1, "b" * 64, "a" * 64, "a" * 64))
    with pytest.raises(DgptError, match="round 2: the head of round 2 does not extend this oracle's receipt of round 1"):
        witness.receive(sign_head(key, 2, "c" * 64, "f" * 64, "a" * 64))
    with pytest.raises(DgptError, match="round 2: the head of round 2 is not signed by the aggregator's key"):
        witness.receive(sign_head(new_key(), 2, "c" * 64, "b" * 64, "a" * 64))


def test_a_stale_or_forged_statement_is_rejected_like_a_bad_payload(tmp_path, monkeypatch, caplog):
    sign, forger = Witness.train_statement, new_key()

    def lying(self, rnd, *args):
        if self.name == "gamma":  # signed with another key than gamma's
            self = copy.copy(self)
            self.key = forger
        return sign(self, rnd + 1 if self.name == "beta" else rnd, *args)  # beta: made for another round

    monkeypatch.setattr(Witness, "train_statement", lying)
    config = tiny_config(tmp_path, federation={"rounds": 1, "inner_steps": 1})
    pretrain_sim(config)
    rows = json.loads(RunDir(config.run_dir).ledger.read_text().splitlines()[1])["oracles"]
    assert rows["beta"]["status"] == "rejected" and rows["beta"]["reason"] == "statement refused: its statement is for round 2, not 1"
    assert rows["gamma"]["reason"] == "statement refused: its signature does not verify under its public key"
    assert rows["alpha"]["status"] == "accepted"
    assert "oracle 'beta' was left out of this round: statement refused" in caplog.text
    assert verify_ledger(config.run_dir).rounds == 1  # a refused statement is kept as it came, and checks out


def test_a_resume_from_an_older_checkpoint_replays_rounds_the_receipts_show(tmp_path):
    """Round checkpoints every 2 rounds: the oracles hold round 3's head when the run resumes from round 2. Each keeps
    round 2's head again and the replayed round 3's after it; the ledger verifies with their receipts."""
    config = tiny_config(tmp_path, federation={**FED, "checkpoint_interval": 2})
    pretrain_sim(config)
    run = RunDir(config.run_dir)
    shutil.rmtree(run.latest_checkpoint())  # round 3's
    pretrain_sim(config)
    summary = verify_ledger(run.root, [run.receipts(n) for n in NAMES])
    assert summary.confirmed == {n: [0, 1, 2, 3] for n in NAMES} and summary.replayed == {n: [3] for n in NAMES}
    assert [r["round"] for r in map(json.loads, run.receipts("alpha").read_text().splitlines())] == [0, 1, 2, 3, 2, 3]


def test_keys_the_config_names_must_be_the_parties_own(tmp_path):
    private, public = keygen(tmp_path / "keys", AGGREGATOR)
    config = tiny_config(tmp_path, federation={"rounds": 1, "inner_steps": 1}, ledger={"public_key": str(public)})
    with pytest.raises(DgptError, match="aggregator's private key not found"):
        pretrain_sim(config)
    shutil.copy(private, RunDir(config.run_dir).private_key(AGGREGATOR))  # the aggregator's own machine holds it
    pretrain_sim(config)
    assert verify_ledger(config.run_dir, keys_dir=tmp_path / "keys").rounds == 1
