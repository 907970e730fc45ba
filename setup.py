"""crossmae-fast: the fastest way to pre-train audio-visual masked autoencoders (CrossMAE)."""

from setuptools import find_packages, setup

setup(
    name="crossmae-fast",
    version="0.1.0",
    description="CrossMAE audio-visual masked autoencoders with fused Triton ops, DALI data and CUDA-graph training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["crossmae_fast", "crossmae_fast.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "torchaudio",
        "triton>=3.0",
        "timm>=1.0",
        "numpy",
        "pillow",
        "av",
        "soundfile",
        "tqdm",
        "webdataset",
        "matplotlib",
        "pyyaml",
        "nvidia-dali-cuda130; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ruff", "import-linter", "tensorboard", "scikit-learn", "scipy"],
        "tensorboard": ["tensorboard"],
        "xformers": ["xformers"],
    },
    entry_points={
        "console_scripts": [
            "crossmae-pretrain=crossmae_fast.pretrain:main",
            "crossmae-evaluate=crossmae_fast.evaluate:main",
            "crossmae-prepare=crossmae_fast.prepare:main",
            "crossmae-synth=crossmae_fast.synth:main",
            "crossmae-finetune=crossmae_fast.finetune:main",
            "crossmae-shard=crossmae_fast.shard:main",
            "crossmae-localize=crossmae_fast.localize:main",
        ]
    },
)
