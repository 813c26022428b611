"""Install minift; the top-level kernels/ folder ships as the subpackage minift.kernels."""
from setuptools import find_packages, setup

setup(
    name="minift",
    version="0.1.0",
    description="Fine-tune Llama-family models three ways (full, LoRA, QLoRA) with an honest account of memory.",
    python_requires=">=3.10",
    packages=find_packages(include=["minift", "minift.*"]) + ["minift.kernels"],
    # A top-level `kernels` package would clash with an existing PyPI distribution.
    package_dir={"minift": "minift", "minift.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",  # F.scaled_dot_product_attention(enable_gqa=...) is new in 2.5
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "tqdm>=4.60",
        "jinja2>=3.1",
    ],
    extras_require={
        # transformers, peft, bitsandbytes, torchao and gguf are test oracles only; minift never
        # imports them. They are pinned to the releases the suite was last checked against: an oracle's
        # new release can change its numbers (bitsandbytes 0.50 added a CPU dequant kernel that
        # disagrees with its own format on some shapes), and CI must not turn red on its own.
        "test": [
            "pytest>=7",
            "hypothesis>=6.100",
            "transformers==5.23.0",
            "peft==0.21.2",
            "bitsandbytes==0.50.2",
            "torchao==0.18.0",
            "gguf==0.19.0",
            "matplotlib>=3.7",
        ],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["minift=minift.__main__:main"]},
)
