"""Small networks shared by tests (built from configs, random weights)."""
import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def tiny_unet2d(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=num_class_embeds,
    ).eval()


def tiny_cond_unet(time_cond_proj_dim=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim,
    ).eval()
