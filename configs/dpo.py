"""LLaVA-Reasoner's DPO stage: preference pairs of the SFT model's own chains, then sigmoid DPO.

  vpd-jax pairs --config=configs/dpo.py:traces=DIR,vocab=FILE --workdir=SFT --output_dir=PAIRS
  vpd-jax train --config=configs/dpo.py:traces=DIR,vocab=FILE,init_from=SFT,pairs=PAIRS --workdir=W
  vpd-jax eval  --config=configs/dpo.py:traces=DIR,val_traces=VAL,vocab=FILE,... --workdir=W

`pairs` samples chains of thought from the SFT checkpoint and keeps (right, wrong) pairs
(vpd_jax/train/pairs.py); `train` starts from the SFT parameters (init_from) and minimises the DPO
loss on the pair task (vpd_jax/train/dpo.py); `eval` scores held-out chain-of-thought accuracy as
for any run. Every argument of configs/vpd_sft.py is accepted too (size, mesh, lengths, traces,
vocab, optimizer...); use the SFT run's size, vocab, prefix_len and suffix_len.

DPO arguments (defaults follow the paper: beta 0.1, learning rate 5e-7, one epoch):
  init_from     workdir of the SFT run: its latest parameters start the policy and are the reference
  pairs         directory written by `vpd-jax pairs`
  reference     stored: the reference log-probs computed once by `vpd-jax pairs` and read from the
                records; on_the_fly: computed every step from the init_from parameters (kept frozen)
  beta          DPO temperature; sft_weight: weight of the chosen chain's per-token NLL (0: off)
Pair sampling (`vpd-jax pairs`):
  samples       chains per question; temperature, top_k, top_p: the sampler
  max_pairs     pairs per question at most; num_questions: first N questions only (0: all)
  pair_batch    decoded rows per batch; pair_shards: output shards; pair_seed: sampling seed
"""

import os

import ml_collections

from vpd_jax.config_args import load_config_file
from vpd_jax.config_args import parse_arg

_DPO_DEFAULTS = dict(
    init_from="", pairs="", reference="stored", beta=0.1, sft_weight=0.0,
    samples=8, temperature=1.0, top_k=0, top_p=1.0, max_pairs=2, num_questions=0,
    pair_batch=64, pair_shards=4, pair_seed=0)
# Training defaults of the DPO stage that differ from SFT's.
_SFT_OVERRIDES = dict(lr="5e-7", total_steps="500", warmup_steps="10", schedule="linear",
                      batch_size="16")
REFERENCE_MODES = ("stored", "on_the_fly")


def _split(arg):
  """(DPO argument string, SFT argument string)."""
  ours, theirs = [], dict(_SFT_OVERRIDES)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key = item.split("=", 1)[0].strip()
    if key in _DPO_DEFAULTS:
      ours.append(item)
    else:
      theirs[key] = item.split("=", 1)[1] if "=" in item else None
  for key, value in theirs.items():
    if value is None:
      raise ValueError(f"config argument {key!r}: expected key=value")
  return ",".join(ours), ",".join(f"{k}={v}" for k, v in theirs.items())


def get_config(arg=None):
  ours, theirs = _split(arg)
  a = parse_arg(ours, **_DPO_DEFAULTS)
  try:
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "vpd_sft.py"), theirs)
  except ValueError as e:
    if "does not exist" in str(e):
      raise ValueError(f"{e}; DPO keys: {', '.join(sorted(_DPO_DEFAULTS))}") from None
    raise
  if a.reference not in REFERENCE_MODES:
    raise ValueError(f"config argument reference={a.reference!r}: expected one of "
                     f"{', '.join(REFERENCE_MODES)}")

  config.loss = "dpo"
  config.loss_args = ml_collections.ConfigDict(dict(beta=a.beta, sft_weight=a.sft_weight))
  config.init_from = a.init_from
  config.reference = a.reference
  # The pairs are the training task; the trace tasks stay registered for evaluation.
  config.data.pairs = a.pairs
  config.data.converter = "pairs_with_reference" if a.reference == "stored" else "pairs"
  config.data.pack = False  # a pair is two unpacked rows
  # No validation loss: the pairs have no validation split (held-out accuracy is `vpd-jax eval`).
  config.eval.every = 0
  config.pairs = ml_collections.ConfigDict(dict(
      samples=a.samples, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
      max_pairs=a.max_pairs, num_questions=a.num_questions, batch_size=a.pair_batch,
      num_shards=a.pair_shards, seed=a.pair_seed))
  return config
