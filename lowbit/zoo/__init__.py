"""Model zoo: CIFAR ResNets (with the published pretrained weights) and a small MNIST CNN.

All models are plain ``nn.Module`` trees with inline functional ops, so ``torch.fx`` can
trace them for quantization.
"""

from lowbit.zoo.registry import (
    ARCHITECTURES,
    CONSTRUCTORS,
    ArchSpec,
    ModelInfo,
    PretrainedWeights,
    build,
    list_models,
    model_info,
    models_cache_dir,
    pretrained,
    pretrained_path,
)
from lowbit.zoo.resnet_cifar import BasicBlock, ResNetCifar, resnet20, resnet32, resnet44, resnet56, resnet110, resnet_cifar
from lowbit.zoo.small_cnn import SmallCNN
from lowbit.zoo.train import cosine_lr, train_classifier
from lowbit.zoo.trained_here import trained_here, trained_here_path
from lowbit.zoo.weights import load_state_dict_strict, load_weights, read_state_dict, save_weights, strip_prefix

__all__ = [
    "ARCHITECTURES",
    "CONSTRUCTORS",
    "ArchSpec",
    "BasicBlock",
    "ModelInfo",
    "PretrainedWeights",
    "ResNetCifar",
    "SmallCNN",
    "build",
    "cosine_lr",
    "list_models",
    "load_state_dict_strict",
    "load_weights",
    "model_info",
    "models_cache_dir",
    "pretrained",
    "pretrained_path",
    "read_state_dict",
    "resnet110",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet_cifar",
    "save_weights",
    "strip_prefix",
    "train_classifier",
    "trained_here",
    "trained_here_path",
]
