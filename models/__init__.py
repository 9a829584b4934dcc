"""Model families of the paper, one file each; `model.name` in the config picks one.

Each family registers a config dataclass (its own keys, validated strictly) and a builder
`build(cfg, spec) -> nn.Module` (models/registry.py). Models know nothing about parallelism, so one model file
serves every layout; only `ghost_bn` touches torch.distributed, because a ghost-BN group may span ranks.
"""

# Importing the families fills the registry.
from models import autoencoder, convnet, lstm, mlp, quadratic, resnet, wide_resnet  # noqa: E402,F401
from models.registry import ModelConfig, build_model, config_class, count_parameters, names, register  # noqa: F401
