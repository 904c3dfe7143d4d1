"""vpd_jax: teach vision-language models to reason (VPD, Pixel Reasoner, LLaVA-Reasoner) in JAX."""

import setuptools

INSTALL_REQUIRES = [
    # The design card's stack.
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "seqio",
    "sentencepiece",
    "ml-collections",
    "google-cloud-storage",
    "absl-py",
    # seqio imports tensorflow and tensorflow_text at import time.
    "tensorflow",
    "tensorflow-text",
    # Training metrics (TensorBoard through clu's metric writers).
    "clu",
    "tensorboard",
    # Checkpoint import/export in the Hugging Face layout.
    "safetensors",
    # tensorflow-datasets needs it to prepare datasets but declares it only for Python < 3.9.
    "importlib_resources",
    # The program-trace pipeline.
    "apache-beam",
    "pillow",
    "scipy",
    "numpy",
]

EXTRAS_REQUIRE = {
    # torch is pinned in constraints.txt to the CPU build; transformers is the reference for parity.
    # gcp-storage-emulator serves GCS's JSON API locally; gcsfs lets orbax's paths reach it.
    "test": ["pytest", "pytest-xdist", "hypothesis", "torch", "transformers",
             "gcp-storage-emulator", "gcsfs"],
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda13]"],
}

setuptools.setup(
    name="vpd_jax",
    version="0.1.0",
    description="Visual program distillation and visual reasoning recipes for JAX/Flax VLMs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vpd_jax", "vpd_jax.*", "bench", "bench.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["vpd-jax=vpd_jax.main:run"]},
)
