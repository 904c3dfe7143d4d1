"""The VPD experiment on ShapesVQA, end to end: traces -> vocabulary -> two models -> evaluation.

  vpd-jax demo --config=configs/demo.py --workdir=workdir/demo              (what `make demo` runs)
  vpd-jax demo --config=configs/demo.py:size=small,steps=2000,num_train=5000 --workdir=W
  make demo ARGS=steps=300,num_eval=500

Two models start from the same initialisation (the same seed) and train with the same steps, batch
and row length (so the same token budget): `direct` on short answers only (NAME.direct) and `vpd` on
the chain-of-thought + direct mixture (NAME.vpd). Both are scored on the held-out split with the
direct prompt, and the vpd model also with the rationale prompt; the program pipeline's own answers
on the same questions are the tool-based reference.

Arguments (key=value, comma separated; an unknown key is an error that lists the known ones):
  seed           seeds the scenes, the programs, the initialisation and the data order
  num_train, num_eval   ShapesVQA examples in the training and held-out splits
  k              programs sampled per training question; families: "" (all) or e.g. count+spatial
  scene          clean | hard
  size           model size (vpd_jax.models.sizes); steps, batch_size, lr, warmup_steps
  prefix_len, suffix_len   text tokens per example; rows hold image tokens + prefix + suffix
  vocab_size     upper bound of the SentencePiece vocabulary trained on the traces
  eval_batch_size
  latency_questions   questions timed one at a time for the latency figures (pipeline and models)
  samples        held-out questions shown in report.html
  workers        program executor worker processes
"""

import os

import ml_collections

from vpd_jax.config_args import load_config_file
from vpd_jax.config_args import parse_arg

# Held-out scenes use seed EVAL_SEED_OFFSET + seed: no training seed reaches them.
EVAL_SEED_OFFSET = 10_000


def get_config(arg=None):
  a = parse_arg(
      arg, seed=0, num_train=600, num_eval=210, k=5, families="", scene="clean",
      size="small", steps=150, batch_size=8, lr=1e-3, warmup_steps=20,
      prefix_len=24, suffix_len=128, vocab_size=2000, eval_batch_size=48,
      latency_questions=8, samples=12, workers=2)
  config = ml_collections.ConfigDict()
  config.seed = a.seed

  # The trace stage of each split: configs/traces_shapes.py. The held-out split has other scenes
  # (another seed) and the same program sampling; its programs are the tool-based reference.
  here = os.path.dirname(__file__)
  traces_arg = (f"k={a.k},scene={a.scene},families={a.families},workers={a.workers},"
                f"num_shards=4")
  config.traces_train = load_config_file(
      os.path.join(here, "traces_shapes.py"),
      f"{traces_arg},num_examples={a.num_train},seed={a.seed}")
  config.traces_eval = load_config_file(
      os.path.join(here, "traces_shapes.py"),
      f"{traces_arg},num_examples={a.num_eval},seed={EVAL_SEED_OFFSET + a.seed}")
  config.vocab_size = a.vocab_size

  # The training run of each model: configs/vpd_sft.py with the same settings; the demo fills in
  # the trace directories, the vocabulary and what to train on (direct or the vpd mixture).
  sft_arg = (f"size={a.size},total_steps={a.steps},batch_size={a.batch_size},seed={a.seed},"
             f"lr={a.lr},warmup_steps={a.warmup_steps},prefix_len={a.prefix_len},"
             f"suffix_len={a.suffix_len},ckpt_every={max(1, a.steps // 3)},keep=1,eval_every=0,"
             f"eval_batch_size={a.eval_batch_size},log_every={max(1, min(25, a.steps // 6))}")
  config.train = load_config_file(os.path.join(here, "vpd_sft.py"), sft_arg)

  config.eval = ml_collections.ConfigDict(dict(
      latency_questions=a.latency_questions, samples=a.samples))
  return config
