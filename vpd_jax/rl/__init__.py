"""Pixel-space reasoning (Pixel Reasoner): operations the model writes as text (zoom_in,
select_frames), the multi-turn environment that runs them, batched KV-cache rollouts, rewards with
curiosity, the GRPO loss ("grpo" in train/steps.LOSSES), warm-start data from program traces and the
training driver (`vpd-jax train --config=configs/pixel_rl.py`)."""
