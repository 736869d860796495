"""Models for EXITS stage 1: timm ViT backbone, attention capture, mask decoder."""
from exits.models.attention import AttentionRecorder, resolve_layers, similarity_matrix
from exits.models.factory import build_mask_model, load_mask_model, save_mask_model
from exits.models.mask_decoder import ImageSkip, MaskDecoder
from exits.models.mask_model import MaskModel
from exits.models.pretrained import LoadReport, extract_state_dict, load_vit_checkpoint, load_vit_state_dict
from exits.models.vit import ConvStemPatchEmbed, build_vit, grid_size, is_conv_stem, patch_tokens

__all__ = [
    "AttentionRecorder",
    "ConvStemPatchEmbed",
    "ImageSkip",
    "LoadReport",
    "MaskDecoder",
    "MaskModel",
    "build_mask_model",
    "build_vit",
    "extract_state_dict",
    "grid_size",
    "is_conv_stem",
    "load_mask_model",
    "load_vit_checkpoint",
    "load_vit_state_dict",
    "patch_tokens",
    "resolve_layers",
    "save_mask_model",
    "similarity_matrix",
]
