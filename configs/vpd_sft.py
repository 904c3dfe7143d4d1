"""VPD distillation by supervised fine-tuning: (image, question) -> rationale + answer, or answer.

  vpd-jax train --config=configs/vpd_sft.py:traces=DIR,vocab=FILE,size=tiny --workdir=W
  vpd-jax train --config=configs/vpd_sft.py:traces=DIR,vocab=FILE,train=direct --workdir=W
      (the direct-answer baseline)
  vpd-jax train --config=configs/vpd_sft.py:size=paligemma-3b,mesh=data:-1+fsdp:8,freeze=img/.*,...

Arguments (key=value, comma separated; an unknown key is an error that lists the known ones):
  size           model size from vpd_jax.models.sizes (tiny, small, paligemma-3b, paligemma2-3b...)
  dtype, param_dtype, remat, attention   numerics and memory settings of the model
  scan_unroll    unroll the layer scans (faster steps on CPU, longer compiles; same numerics)
  flash_block_q, flash_block_k   flash-attention block sizes (attention=pallas or auto); 0 picks
                 the backend's default
  chunked_ce     compute the output projection and cross-entropy in chunks of the sequence (loss
                 "sft_chunked": the [B, L, V] logits never exist; same loss and gradients)
  total_steps, batch_size (global, over all hosts), seed
  lr, schedule (cosine | linear | constant), warmup_steps, end_lr_factor, weight_decay, clip_norm,
  grad_accum (micro-batches per step)
  mesh           axis:size pairs joined by "+", one size -1 for the remaining devices
                 (data:-1, data:2+fsdp:-1, data:-1+fsdp:1+tensor:4)
  freeze         regex over parameter names to freeze, e.g. img/.* (the image tower); "" trains all
  lora           adapter rank (0: no LoRA); lora_targets: regexes joined by "+"; lora_alpha
  traces         trace directory (`vpd-jax traces`) to register the tasks NAME.cot, NAME.direct and
                 the mixture NAME.vpd from; val_traces: a second one, the "validation" split
  vocab          SentencePiece model (`vpd-jax vocab`); required with traces
  name           the prefix of the registered task names (default "shapes")
  train          what to train on: vpd (the mixture), cot, direct, or any registered seqio name
  prefix_len, suffix_len   text tokens per example (rows are image tokens + prefix + suffix)
  pack, images_per_row     packing of several examples per row
  ckpt_every, keep         checkpoint period in steps and how many checkpoints stay on disk
  eval_every, eval_steps, eval_batch_size   validation loss (needs val_traces); 0 turns it off
  log_every      progress line and metrics period
"""

import ml_collections

from vpd_jax.config_args import parse_arg
from vpd_jax.config_args import parse_mesh


def get_config(arg=None):
  a = parse_arg(
      arg, size="tiny", dtype="float32", param_dtype="float32", remat="none", attention="xla",
      scan_unroll=False, flash_block_q=0, flash_block_k=0, chunked_ce=False,
      total_steps=1000, batch_size=32, seed=0,
      lr=1e-4, schedule="cosine", warmup_steps=100, end_lr_factor=0.0, weight_decay=0.0,
      clip_norm=1.0, grad_accum=1,
      mesh="data:-1", freeze="", lora=0, lora_alpha=0.0,
      lora_targets="llm/layers/attn/.*+llm/layers/mlp/.*",
      traces="", val_traces="", vocab="", name="shapes", train="vpd",
      prefix_len=32, suffix_len=128, pack=True, images_per_row=4,
      ckpt_every=500, keep=3, eval_every=500, eval_steps=20, eval_batch_size=0, log_every=50)
  config = ml_collections.ConfigDict()
  config.seed = a.seed
  config.total_steps = a.total_steps
  config.batch_size = a.batch_size
  config.loss = "sft_chunked" if a.chunked_ce else "sft"
  config.log_every = a.log_every

  config.model = ml_collections.ConfigDict(dict(
      size=a.size, dtype=a.dtype, param_dtype=a.param_dtype, remat=a.remat,
      attention_impl=a.attention, scan_unroll=a.scan_unroll,
      flash_block_q=a.flash_block_q or None, flash_block_k=a.flash_block_k or None))

  # [(axis, size)]; axes left out have size 1 (the sharding rules skip absent axes).
  config.mesh = parse_mesh(a.mesh)

  # vpd_jax/train/optim.py's keys. Freezing is a None multiplier for a name regex (big_vision).
  config.optim = ml_collections.ConfigDict(dict(
      lr=a.lr, schedule=a.schedule, warmup_steps=a.warmup_steps, end_lr_factor=a.end_lr_factor,
      weight_decay=a.weight_decay, clip_norm=a.clip_norm, grad_accum_steps=a.grad_accum,
      param_groups=((a.freeze, None), (".*", 1.0)) if a.freeze else ((".*", 1.0),)))

  if a.lora and a.freeze:
    raise ValueError(f"config arguments lora={a.lora} and freeze={a.freeze!r} exclude each other: "
                     "with LoRA every base parameter is frozen; choose lora_targets instead")
  config.lora = None
  if a.lora:
    config.lora = ml_collections.ConfigDict(dict(
        rank=a.lora, alpha=a.lora_alpha or float(a.lora), targets=tuple(a.lora_targets.split("+"))))

  config.data = ml_collections.ConfigDict(dict(
      traces=a.traces, val_traces=a.val_traces, vocab=a.vocab, name=a.name, train=a.train,
      prefix_len=a.prefix_len, suffix_len=a.suffix_len, pack=a.pack,
      images_per_row=a.images_per_row))

  config.checkpoint = ml_collections.ConfigDict(dict(every=a.ckpt_every, keep=a.keep))

  config.eval = ml_collections.ConfigDict(dict(
      every=a.eval_every if a.val_traces else 0, steps=a.eval_steps, split="validation",
      batch_size=a.eval_batch_size or a.batch_size))
  return config
