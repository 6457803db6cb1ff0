"""The decoder and its heads: plain torch modules (`gpt`, `heads`, `generate`), and the decoder's shape
(`config`, without torch). Imports nothing of dgpt but itself: no data, training, files or processes."""
