"""Clean-data readers and the in-memory ImageSet."""
from .cifar10 import load_cifar10
from .dataset import ImageSet, balanced_subset, split
from .fashion_mnist import load_fashion_mnist

DATASETS = {"cifar10": load_cifar10, "fashion_mnist": load_fashion_mnist}


def load_dataset(name: str, split_name: str = "train") -> ImageSet:
    """A built-in benchmark data set by name: ``cifar10`` or ``fashion_mnist``."""
    try:
        return DATASETS[name](split_name)
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


__all__ = ["DATASETS", "ImageSet", "balanced_subset", "load_cifar10", "load_dataset", "load_fashion_mnist", "split"]
