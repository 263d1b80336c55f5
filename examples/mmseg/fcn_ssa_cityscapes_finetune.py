# mmseg 1.x config: fine-tune mmseg's own FCN (ResNet-50-D8, Cityscapes, 80k iterations) with SSA-Seg classifiers on
# the decode and the auxiliary head, evaluated by mmseg's slide inference (context="image" would build each image's
# classifier from all its tiles; tile context is the recommendation: docs/large-images.md, "Which context").
# Run with mmseg's tools/train.py (docs/integrations.md, "From mmseg"); adaptive_heads must be importable.
_base_ = ["mmseg::fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024.py"]

custom_imports = dict(imports=["adaptive_heads.integrations.mmseg"], allow_failed_imports=False)

model = dict(
    type="AdaptiveEncoderDecoder",  # was EncoderDecoder: it reads test_cfg's context
    decode_head=dict(type="AdaptiveFCNHead", adaptive=dict(type="SSAClassifier")),  # was FCNHead
    auxiliary_head=dict(type="AdaptiveFCNHead", adaptive=dict(type="SSAClassifier")),  # extra terms weighted 0.4
    test_cfg=dict(mode="slide", crop_size=(512, 1024), stride=(341, 682), context="tile"),  # or "image"
)

# start from the trained FCN: each head's conv_seg becomes its coarse classifier (conv_seg.conv_seg), the SSA-Seg
# layers start from their own initialisation (mmengine lists them as missing keys)
load_from = (
    "https://download.openmmlab.com/mmsegmentation/v0.5/fcn/fcn_r50-d8_512x1024_80k_cityscapes/"
    "fcn_r50-d8_512x1024_80k_cityscapes_20200606_113019-03aa804d.pth"
)
train_cfg = dict(max_iters=20000, val_interval=2000)
param_scheduler = [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=20000, by_epoch=False)]
optim_wrapper = dict(optimizer=dict(lr=0.005))
