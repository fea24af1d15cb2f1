"""The demo models' architectures: the VAE (64x64 -> 16x16x4) and the SD-architecture teacher."""

VAE_ARCH = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, embed_dim=4)   # 4x down

# The demo teacher (SD-architecture, tiny): UNet on 16x16x4 latents, one frozen text tower.
# v-prediction (SD2's target): at high t the v loss weighs the x0 error ~1 where the eps loss weighs
# it abar_t/(1 - abar_t) ~ 0.005, and only there is the background hidden from the UNet: an eps
# teacher never learnt the background from the text (x0 at t=999 was the same for every background).
TEACHER_ARCH = dict(
    family="demo", text_family="sd21", default_size=64, prediction_type="v_prediction",
    unet=dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=[1, 2, 2],
              transformer_depth=[1, 1, 1], transformer_depth_middle=1, num_head_channels=32, context_dim=32,
              use_linear_in_transformer=True),
    text=dict(towers=[dict(width=32, layers=2, heads=2, act="gelu", proj_dim=None, pad_token_id=0,
                           layer="last", final_norm=True)], pooled_from=None))
