"""unclip-jax: a JAX/Flax reimplementation of unCLIP (DALL-E 2)."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1,<3",
    "tensorflow-datasets>=4.9.8,<5",
    "array-record>=0.7,<0.9",
    "grain>=0.2.12,<0.3",
    "etils[epath,epy]>=1.10",
    "transformers>=5.0,<6",
    "tokenizers>=0.21,<0.24",
    "safetensors>=0.4,<0.9",
    "pillow>=10.3,<14",
    "numpy>=1.26,<3",
    "tqdm>=4.66,<5",
    "tensorboardx>=2.6.2,<3",  # TensorBoard event files without TensorFlow
    "matplotlib>=3.8,<4",  # loss-curve PNGs
]

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (DALL-E 2) in JAX/Flax: CLIP, diffusion prior, decoder, upsamplers",
    python_requires=">=3.11",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # CPU torch for the Hugging Face CLIP parity test (transformers' torch CLIPModel). This
        # exact pin installs a CPU build on these machines, without several GB of GPU packages.
        "parity": ["torch==2.13.0"],
        # diffusers: the reference of the Karlo (published unCLIP) importer's parity tests;
        # pytorch-fid: the FID InceptionV3's. pytorch-fid builds its network from torchvision,
        # whose wheels here are CUDA builds that need their own torch (about 5.5 GB; they run on
        # the CPU), so the test extra takes that torch instead of the small CPU build above.
        "test": ["pytest>=8,<10", "chex>=0.1.90,<0.2", "torch==2.14.1", "torchvision==0.29.1",
                 "pytorch-fid==0.3.0", "diffusers==0.42.1"],
        # libtpu: on a TPU VM, and on any host to compile for TPU topologies ahead of time
        # (benchmarks/compile_only.py). Best in its own environment: with libtpu installed, JAX
        # looks for TPU chips at start-up.
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        # NVIDIA GPUs: CUDA 12 wheels of jaxlib and its plugin.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.13"],
    },
)
