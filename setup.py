"""Install: pip install -e . (GPU users bring their own CUDA torch; CPU: pip install torch==2.13.0 first)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="video-vae-trainer",
    version="0.1.0",
    description="DeepSpeed ZeRO trainer for CogVideoX-style causal 3D video autoencoders "
    "(reconstruction + LPIPS + adversarial, adaptive weight)",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["models", "models.*", "losses", "losses.*", "data", "data.*", "trainer", "trainer.*"]
    ),
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "braceexpand",
        "pillow",  # image samples, JPEG degradation
        "fsspec[http]>=2023.6",  # remote shards (http/https through aiohttp)
        "s3fs>=2023.6",  # s3:// shards
        "av>=14.1",  # VideoFrame.rotation (display matrices: phone videos decode upright)
        "einops>=0.7",
        "numpy",
        "scikit-image>=0.22",
        "tensorboard>=2.14",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "diffusers>=0.32", "ruff", "moto[server]>=5", "boto3"],
    },
)
