"""Preference pairs from a model's own chains of thought (LLaVA-Reasoner's DPO data).

  stats = build_pairs(config, sft_workdir, output_dir)     # `vpd-jax pairs` runs this

For every training question (the trace records of `config.data.traces`) the latest checkpoint of
`sft_workdir` samples `config.pairs.samples` chains of thought from the chain-of-thought prompt
(temperature sampling, batched, with the KV cache of models/decode.py). Each chain's final answer
(eval/metrics.extract_final_answer) is scored against the question's labels after the VQA answer
normalisation the evaluation uses. Identical chains count once; each correct chain is paired with
a different incorrect one, at most `config.pairs.max_pairs` pairs per question. A question whose
chains are all right or all wrong gives no pair.

With `config.reference == "stored"` the sampling model's log-probability of every chosen and
rejected chain is computed on the same rows the DPO step will see (data/pairs.py's converter) and
stored in the records, so training needs no second model.

Output, in `output_dir`: `pairs-00000-of-00004.tfrecord`-style shards of data/pairs.py's records and
`manifest.json` (the statistics, the settings and the shard names), each written to a temporary
name and renamed into place; the manifest comes last, so its presence means the set is complete.
Statistics: questions, questions_with_pair (and their share), pairs, chains (distinct chains per
question, summed), correct_chains, chain_accuracy (percent of those chains with a right answer),
unfinished_chains (no EOS within suffix_len tokens), questions_all_correct, questions_all_wrong,
and the same per question family. Sampling runs on one host.

`score_pairs(config, workdir, pair_dir)` measures how a run ranks the chains of a pair directory
(log-prob gap and DPO reward margin against the stored reference), e.g. on held-out pairs.
"""

import json
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from vpd_jax import sharding as sharding_lib
from vpd_jax.data import features
from vpd_jax.data import pairs as pair_data
from vpd_jax.data import preprocessors as prep
from vpd_jax.data import vocab as vocab_lib
from vpd_jax.eval import metrics
from vpd_jax.models import decode
from vpd_jax.models import sizes
from vpd_jax.models import vlm
from vpd_jax.programs import records as records_lib
from vpd_jax.train import dpo
from vpd_jax.train import optim
from vpd_jax.train import state as state_lib
from vpd_jax.train import steps

_PROMPT_ROWS = ("images",) + vlm.ROW_FEATURES


def model_config_of(config) -> sizes.VLMConfig:
  return sizes.from_model_section(config.model)


def mesh_of(config):
  """The config's mesh; axes it leaves out get size 1 (as the training loop builds it)."""
  spec = [tuple(axis) for axis in config.mesh]
  spec += [(name, 1) for name in ("data", "fsdp", "tensor") if name not in {a[0] for a in spec}]
  return sharding_lib.make_mesh(spec)


def abstract_params(model_config: sizes.VLMConfig, mesh, optim_config, total_steps: int):
  """The parameters' ShapeDtypeStructs with their shardings on `mesh`."""
  optimizer = optim.make_optimizer(optim_config, total_steps)
  abstract, _ = state_lib.abstract_state(vlm.VLM(model_config), vlm.example_inputs(model_config),
                                         optimizer, mesh)
  return abstract.params


# ------------------------------------------------------------------------------------ scoring

def is_correct(answer: str, labels: Sequence[str]) -> bool:
  """Whether a chain's final answer matches one of the labels after VQA normalisation."""
  normalised = metrics.normalize_vqa_answer(answer)
  return any(normalised == metrics.normalize_vqa_answer(label) for label in labels)


def pair_chains(correct: Sequence[bool], max_pairs: int) -> list[tuple[int, int]]:
  """(chosen, rejected) chain indices: the i-th right chain with the i-th wrong one, in order."""
  right = [i for i, c in enumerate(correct) if c]
  wrong = [i for i, c in enumerate(correct) if not c]
  return list(zip(right, wrong))[:max_pairs]


def unique_chains(chains: Sequence[Sequence[int]]) -> list[int]:
  """Indices of the first occurrence of each distinct token sequence."""
  seen, keep = set(), []
  for i, chain in enumerate(chains):
    key = tuple(chain)
    if key not in seen:
      seen.add(key)
      keep.append(i)
  return keep


def decode_text(vocab, tokens: Sequence[int]) -> str:
  """The text of a chain (EOS dropped; ids outside the vocabulary read as unknown)."""
  ids = [t for t in tokens if t != vocab.eos_id]
  ids = [t if 0 <= t < vocab.vocab_size else vocab.unk_id for t in ids]
  return vocab.decode(ids)


# ------------------------------------------------------------------------------------ sampling

def prompt_rows(images: Sequence[bytes], prompt_tokens: Sequence[Sequence[int]], image_size: int,
                num_image_tokens: int, prefix_len: int) -> tf.data.Dataset:
  """Unpacked prompt rows (image + prefix, no suffix) in the feature converter's layout."""
  def generate():
    for image, tokens in zip(images, prompt_tokens):
      yield {"image": image, "prefix": np.asarray(tokens, np.int32),
             "suffix": np.zeros([0], np.int32)}
  ds = tf.data.Dataset.from_generator(generate, output_signature={
      "image": tf.TensorSpec([], tf.string), "prefix": tf.TensorSpec([None], tf.int32),
      "suffix": tf.TensorSpec([None], tf.int32)})
  ds = ds.map(lambda ex: {**ex, "image": prep.decode_image(ex["image"], image_size)})
  converter = features.VLMFeatureConverter(num_image_tokens, pack=False)
  return converter(ds, {"prefix": prefix_len, "suffix": 0})


def _batches(ds: tf.data.Dataset, size: int, keys: Sequence[str]) -> Iterator[tuple[int, dict]]:
  """(real rows, batch padded to `size` rows by repeating the last row)."""
  for batch in ds.batch(size).as_numpy_iterator():
    n = len(batch[keys[0]])
    yield n, {k: np.concatenate([batch[k], np.repeat(batch[k][-1:], size - n, axis=0)])
              for k in keys}


def sample_chains(model_config, params, mesh, rows: tf.data.Dataset, samples: int,
                  questions_per_batch: int, sampling: decode.SamplingConfig,
                  rng: jax.Array) -> list[list[list[int]]]:
  """`samples` chains per prompt row: token ids, EOS included when the chain stopped."""
  chains = []
  for b, (n, batch) in enumerate(_batches(rows, questions_per_batch, _PROMPT_ROWS)):
    repeated = {k: np.repeat(v, samples, axis=0) for k, v in batch.items()}
    with jax.set_mesh(mesh):
      out = decode.generate(model_config, params, sharding_lib.shard_batch(repeated, mesh),
                            jax.random.fold_in(rng, b), sampling)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for q in range(n):
      chains.append([tokens[q * samples + s, :lengths[q * samples + s]].tolist()
                     for s in range(samples)])
    logging.info("sampled chains for %d questions", len(chains))
  return chains


def reference_logps(model_config, params, mesh, pairs: Sequence[pair_data.PairRecord],
                    prefix_len: int, suffix_len: int, batch_size: int) -> np.ndarray:
  """float32 [len(pairs), 2]: `params`' log-probabilities of each (chosen, rejected) chain, on the
  rows PairFeatureConverter builds for training."""
  def generate():
    for p in pairs:
      yield {"image": p.image, "prefix": np.asarray(p.prompt_tokens, np.int32),
             "chosen": np.asarray(p.chosen_tokens, np.int32),
             "rejected": np.asarray(p.rejected_tokens, np.int32)}
  ds = tf.data.Dataset.from_generator(generate, output_signature={
      "image": tf.TensorSpec([], tf.string), **{k: tf.TensorSpec([None], tf.int32)
                                               for k in ("prefix", "chosen", "rejected")}})
  ds = ds.map(lambda ex: {**ex, "image": prep.decode_image(ex["image"],
                                                            model_config.vit.image_size)})
  ds = pair_data.PairFeatureConverter(model_config.num_image_tokens)(
      ds, {"prefix": prefix_len, "suffix": suffix_len})
  keys = ("images",) + dpo.PAIR_ROW_FEATURES
  reference = dpo.make_reference_fn(steps.make_apply_fn(vlm.VLM(model_config)), mesh,
                                    jax.tree.map(lambda x: x.sharding, params))
  out = []
  for n, batch in _batches(ds, batch_size, keys):
    out.append(np.asarray(reference(params, sharding_lib.shard_batch(batch, mesh)))[:n])
  return np.concatenate(out) if out else np.zeros([0, 2], np.float32)


# ------------------------------------------------------------------------------------ writing

def write_pairs(output_dir: str, pairs: Sequence[pair_data.PairRecord], num_shards: int,
                manifest: Mapping[str, Any]) -> dict:
  """Writes the shards, then manifest.json (`manifest` with the shard names added), each
  atomically; returns what manifest.json holds."""
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards}: expected at least one shard")
  tf.io.gfile.makedirs(output_dir)
  names = []
  for index in range(num_shards):
    name = pair_data.SHARD_PATTERN.format(index=index, count=num_shards)
    path = os.path.join(output_dir, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
      for pair in pairs[index::num_shards]:
        writer.write(pair.serialize())
    tf.io.gfile.rename(tmp, path, overwrite=True)
    names.append(name)
  record = {**manifest, "shards": names}
  records_lib.write_atomic(os.path.join(output_dir, pair_data.MANIFEST_FILE),
                           (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))
  return record


def read_manifest(pair_dir: str) -> dict:
  path = os.path.join(pair_dir, pair_data.MANIFEST_FILE)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"pair directory {pair_dir!r} has no {pair_data.MANIFEST_FILE}: it "
                            "is not a complete `vpd-jax pairs` output")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def read_pairs(pair_dir: str) -> list[pair_data.PairRecord]:
  """Every pair record of a directory, shard by shard."""
  paths = sorted(tf.io.gfile.glob(os.path.join(pair_dir, pair_data.FILE_PATTERN)))
  return [pair_data.PairRecord.parse(data) for path in paths
          for data in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def score_pairs(config, workdir: str, pair_dir: str) -> dict:
  """How the latest parameters of `workdir` rank the chains of `pair_dir` (written with reference
  log-probs): the mean log-prob gap log p(chosen) - log p(rejected), and the DPO implicit reward
  margin beta * (gap - reference gap) with the share of pairs where it is positive."""
  records = read_pairs(pair_dir)
  if not records:
    raise ValueError(f"pair directory {pair_dir!r} holds no pairs to score")
  if any(p.ref_chosen_logp is None for p in records):
    raise ValueError(f"pairs in {pair_dir!r} carry no reference log-probs; write them with "
                     "reference=stored")
  model_config = model_config_of(config)
  mesh = mesh_of(config)
  params, step = dpo.load_params(
      workdir, config.model.size,
      abstract_params(model_config, mesh, config.optim, config.total_steps))
  logps = reference_logps(model_config, params, mesh, records, config.data.prefix_len,
                          config.data.suffix_len, config.pairs.batch_size)
  reference = np.array([[p.ref_chosen_logp, p.ref_rejected_logp] for p in records])
  gap = logps[:, 0] - logps[:, 1]
  margin = config.loss_args.beta * (gap - (reference[:, 0] - reference[:, 1]))
  return {"workdir": workdir, "step": step, "pairs": len(records),
          "logp_gap": float(gap.mean()), "reference_logp_gap": float(
              (reference[:, 0] - reference[:, 1]).mean()),
          "reward_margin": float(margin.mean()),
          "reward_accuracy": float(100.0 * (margin > 0).mean())}


# ------------------------------------------------------------------------------------ statistics

def _count(question_chains: Sequence[Sequence[bool]], question_pairs: Sequence[int]) -> dict:
  chains = sum(len(c) for c in question_chains)
  correct = sum(sum(c) for c in question_chains)
  questions = len(question_chains)
  with_pair = sum(1 for n in question_pairs if n)
  return {"questions": questions, "questions_with_pair": with_pair,
          "share_with_pair": 100.0 * with_pair / max(questions, 1),
          "pairs": int(sum(question_pairs)), "chains": chains, "correct_chains": int(correct),
          "chain_accuracy": 100.0 * correct / max(chains, 1),
          "questions_all_correct": sum(1 for c in question_chains if c and all(c)),
          "questions_all_wrong": sum(1 for c in question_chains if not any(c))}


# ------------------------------------------------------------------------------------ the command

def build_pairs(config, sft_workdir: str, output_dir: str) -> dict:
  """Samples, scores and pairs chains for the training questions; writes them; returns what
  manifest.json holds ("statistics", the settings, "shards")."""
  if jax.process_count() > 1:
    raise ValueError("`vpd-jax pairs` samples on one host; run it as a single process")
  settings = config.pairs
  if settings.samples < 2:
    raise ValueError(f"config pairs.samples={settings.samples}: a pair needs at least 2 chains")
  if settings.max_pairs < 1:
    raise ValueError(f"config pairs.max_pairs={settings.max_pairs}: expected >= 1")
  if not config.data.traces or not config.data.vocab:
    raise ValueError("config data.traces and data.vocab are required: the questions come from "
                     "the trace records and the prompts are tokenised with the vocabulary")
  try:
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators belong to jax
  except RuntimeError:
    pass
  model_config = model_config_of(config)
  mesh = mesh_of(config)
  params, step = dpo.load_params(
      sft_workdir, config.model.size,
      abstract_params(model_config, mesh, config.optim, config.total_steps))
  vocab = vocab_lib.load_vocabulary(config.data.vocab)
  template = prep.resolve_prompts(config.data.get("prompts") or None)["cot"]
  prefix_len, suffix_len = config.data.prefix_len, config.data.suffix_len

  traces = list(records_lib.read_records(config.data.traces))
  if settings.num_questions:
    traces = traces[:settings.num_questions]
  prompts = [template.replace(prep.QUESTION_FIELD, r.question) for r in traces]
  prompt_tokens = [list(vocab.encode(p))[:prefix_len] for p in prompts]
  rows = prompt_rows([r.image for r in traces], prompt_tokens, model_config.vit.image_size,
                     model_config.num_image_tokens, prefix_len)
  sampling = decode.SamplingConfig(
      max_new_tokens=suffix_len, temperature=settings.temperature, top_k=settings.top_k,
      top_p=settings.top_p, eos_id=vocab.eos_id, pad_id=vocab.pad_id)
  shards = sharding_lib.axes_size(mesh, sharding_lib.batch_axes(mesh))
  per_batch = max(1, settings.batch_size // settings.samples)
  while (per_batch * settings.samples) % shards:
    per_batch += 1
  chains = sample_chains(model_config, params, mesh, rows, settings.samples, per_batch, sampling,
                         jax.random.key(settings.seed))

  pairs, question_correct, question_pairs, families = [], [], [], []
  unfinished = 0
  for record, prompt, tokens, question_chains in zip(traces, prompts, prompt_tokens, chains):
    unfinished += sum(1 for c in question_chains if vocab.eos_id not in c)
    keep = unique_chains(question_chains)
    texts = [decode_text(vocab, question_chains[i]) for i in keep]
    answers = [metrics.extract_final_answer(t) for t in texts]
    correct = [is_correct(a, record.answers) for a in answers]
    chosen_rejected = pair_chains(correct, settings.max_pairs)
    for c, r in chosen_rejected:
      pairs.append(pair_data.PairRecord(
          example_id=record.example_id, image=record.image, question=record.question,
          answers=list(record.answers), family=record.family, prompt=prompt,
          prompt_tokens=tokens, chosen_tokens=question_chains[keep[c]],
          rejected_tokens=question_chains[keep[r]], chosen_text=texts[c], rejected_text=texts[r],
          chosen_answer=answers[c], rejected_answer=answers[r]))
    question_correct.append(correct)
    question_pairs.append(len(chosen_rejected))
    families.append(record.family)

  with_reference = config.reference == "stored"
  if with_reference and pairs:
    logps = reference_logps(model_config, params, mesh, pairs, prefix_len, suffix_len,
                            settings.batch_size)
    for pair, (chosen, rejected) in zip(pairs, logps):
      pair.ref_chosen_logp, pair.ref_rejected_logp = float(chosen), float(rejected)

  stats = _count(question_correct, question_pairs)
  stats["unfinished_chains"] = unfinished
  stats["by_family"] = {
      family: _count([c for c, f in zip(question_correct, families) if f == family],
                     [n for n, f in zip(question_pairs, families) if f == family])
      for family in sorted(set(families))}
  manifest = {"statistics": stats, "with_reference": with_reference,
              "sft_workdir": sft_workdir, "checkpoint_step": step,
              "trace_dir": config.data.traces, "vocab": config.data.vocab,
              "model_size": config.model.size, "prompt_template": template,
              "prefix_len": prefix_len, "suffix_len": suffix_len,
              "sampling": {k: settings[k] for k in ("samples", "temperature", "top_k", "top_p",
                                                    "max_pairs", "seed")}}
  manifest = write_pairs(output_dir, pairs, settings.num_shards, manifest)
  logging.info("%d pairs from %d of %d questions written to %s", stats["pairs"],
               stats["questions_with_pair"], stats["questions"], output_dir)
  return manifest
