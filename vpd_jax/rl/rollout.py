"""Batched multi-turn rollouts with the KV cache: prefill, decode a turn, run the environment,
repeat.

  result = rollout(model, params, tasks, vocab, rng, RolloutConfig(...), EnvConfig(...))

Every turn, each unfinished conversation becomes one row (conversation.py: first view, prompt,
earlier turns, operation outputs), all rows are prefilled together into a fresh KV cache and the
model writes its next turn token by token (`VLM.extend`, one jitted while loop for the whole batch,
stopping at EOS or `max_new_tokens`). The environment (env.py) then parses each turn, executes its
operation on the original pixels and appends the result. Shapes stay fixed (every row is padded to
`row_length` tokens and `max_images` images), so the turn function compiles once.

A conversation that would not fit another turn (row_length) or another image (max_images) is
stopped without an answer. `RolloutResult` carries each conversation's final row for training, its
episode (answer, operations, errors) and the seconds spent in the model and in the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models import decode as decode_lib
from vpd_jax.models import vlm
from vpd_jax.rl import conversation
from vpd_jax.rl import env as env_lib


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  row_length: int = 256
  max_images: int = 4
  max_new_tokens: int = 32
  temperature: float = 1.0
  eos_id: int = 1
  pad_id: int = 0
  # Ids at or above this are never sampled: a model's embedding is often larger than the
  # tokenizer (tiny: 4,096 rows for a ShapesVQA vocabulary of fewer pieces). None: no limit.
  vocab_size: Optional[int] = None

  def __post_init__(self):
    if self.row_length < 1 or self.max_images < 1 or self.max_new_tokens < 1:
      raise ValueError(f"RolloutConfig: row_length, max_images and max_new_tokens must be "
                       f"positive, got {self}")
    if self.vocab_size is not None and self.vocab_size <= max(self.eos_id, self.pad_id):
      raise ValueError(f"RolloutConfig.vocab_size={self.vocab_size} must exceed the EOS and pad "
                       "ids")

  @property
  def sampling(self) -> decode_lib.SamplingConfig:
    return decode_lib.SamplingConfig(max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, eos_id=self.eos_id,
                                     pad_id=self.pad_id)


@dataclasses.dataclass
class RolloutResult:
  rows: dict  # padded conversation rows [B, row_length] and images, for training
  episodes: list  # env.Episode per conversation, in task order
  model_seconds: float
  env_seconds: float
  turns: int  # decoding rounds run

  @property
  def num_ops(self) -> np.ndarray:
    return np.array([e.num_ops for e in self.episodes])

  @property
  def correct(self) -> np.ndarray:
    return np.array([e.correct for e in self.episodes])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _decode_turn(model_config, sampling, vocab_size, params, batch, rng):
  """Prefills the rows and samples each row's next turn: (tokens [B, T], lengths [B])."""
  model = vlm.VLM(model_config)
  steps = sampling.max_new_tokens
  rows, length = batch["tokens"].shape
  logits, cache = conversation.prefill(model, params, batch, length + steps)

  def step(state):
    i, tokens, lengths, done, logits, cache = state
    if vocab_size is not None:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    token = decode_lib.sample_tokens(logits, jax.random.fold_in(rng, i), sampling)
    token = jnp.where(done, sampling.pad_id, token)
    tokens = tokens.at[:, i].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (token == sampling.eos_id)
    logits, cache = model.apply({"params": params}, token, cache, method=vlm.VLM.extend)
    return i + 1, tokens, lengths, done, logits, cache

  def running(state):
    return (state[0] < steps) & ~jnp.all(state[3])

  state = (jnp.int32(0), jnp.full((rows, steps), sampling.pad_id, jnp.int32),
           jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool), logits, cache)
  _, tokens, lengths, _, _, _ = jax.lax.while_loop(running, step, state)
  return tokens, lengths


def truncate(arrays: dict, length: int, max_images: int) -> dict:
  """Cuts an unpadded conversation to `length` tokens and `max_images` images (what a budget
  stop leaves after the last turn that fitted)."""
  cut = min(length, arrays["tokens"].shape[0])
  over = np.nonzero(arrays["image_slot"] >= max_images)[0]
  if over.size:
    cut = min(cut, int(over[0]))
  out = {k: (v[:cut] if isinstance(v, np.ndarray) else v) for k, v in arrays.items()}
  out["loss_mask"] = out["loss_mask"].copy()
  if cut:
    out["loss_mask"][cut - 1] = 0  # its target was cut away
  out["images"] = arrays["images"][:max_images]
  return out


def _row_arrays(episode, vocab, model_config) -> dict:
  return conversation.build_row(episode.task, episode.segments, vocab.encode,
                                model_config.num_image_tokens, model_config.vit.image_size).arrays()


def _fits(arrays: dict, config: RolloutConfig) -> bool:
  return (arrays["tokens"].shape[0] + config.max_new_tokens <= config.row_length
          and len(arrays["images"]) <= config.max_images)


def rollout(model_config, params, tasks: Sequence[env_lib.Task], vocab: Any, rng: jax.Array,
            config: RolloutConfig = RolloutConfig(),
            env_config: env_lib.EnvConfig = env_lib.EnvConfig(),
            max_turns: Optional[int] = None) -> RolloutResult:
  """Runs one conversation per task to the end; see the module docstring.

  vocab: encode(text) -> ids and decode(ids) -> text (a seqio vocabulary). max_turns defaults to
  env_config.max_turns.
  """
  episodes = [env_lib.Episode(task, env_config) for task in tasks]
  max_turns = env_config.max_turns if max_turns is None else max_turns
  size = model_config.vit.image_size
  model_seconds = env_seconds = 0.0
  turns = 0
  while turns < max_turns and not all(e.done for e in episodes):
    start = time.perf_counter()
    arrays = []
    for e in episodes:
      a = _row_arrays(e, vocab, model_config)
      if not e.done and not _fits(a, config):
        e.stop()
      arrays.append(truncate(a, config.row_length, config.max_images) if e.done else a)
    if all(e.done for e in episodes):
      env_seconds += time.perf_counter() - start
      break
    batch = conversation.pad_rows(arrays, config.row_length, config.max_images, size)
    inputs = {k: batch[k] for k in conversation.MODEL_INPUTS}
    env_seconds += time.perf_counter() - start

    start = time.perf_counter()
    tokens, lengths = jax.device_get(_decode_turn(model_config, config.sampling,
                                                  config.vocab_size, params, inputs,
                                                  jax.random.fold_in(rng, turns)))
    model_seconds += time.perf_counter() - start
    turns += 1

    start = time.perf_counter()
    for e, ids, n in zip(episodes, tokens, lengths):
      if e.done:
        continue
      ids = [int(t) for t in ids[:n]]
      text_ids = ids[:-1] if ids and ids[-1] == config.eos_id else ids
      e.step(vocab.decode(text_ids), tokens=ids)
    env_seconds += time.perf_counter() - start

  start = time.perf_counter()
  for e in episodes:
    if not e.done:
      e.stop()
  final = [truncate(_row_arrays(e, vocab, model_config), config.row_length, config.max_images)
           for e in episodes]
  rows = conversation.pad_rows(final, config.row_length, config.max_images, size)
  env_seconds += time.perf_counter() - start
  return RolloutResult(rows, episodes, model_seconds, env_seconds, turns)
