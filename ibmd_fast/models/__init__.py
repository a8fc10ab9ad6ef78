"""Networks: the ADM U-Net, the teacher / generator / fake-model wrappers, and checkpoint reading."""

from .checkpoints import extract_state_dict, load_checkpoint_file, load_state_dict_checked
from .blocks import timestep_embedding
from .unet import CONFIGS, UNet, attention_rates, build_unet, count_parameters
from .wrappers import BridgeModel, Generator, Teacher, make_fake_model

__all__ = [
    "CONFIGS",
    "UNet",
    "attention_rates",
    "build_unet",
    "count_parameters",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_state_dict_checked",
    "timestep_embedding",
    "BridgeModel",
    "Generator",
    "Teacher",
    "make_fake_model",
]
