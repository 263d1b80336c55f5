# mmseg 1.x config: UPerNet (Swin-T) on ADE20K with the CAC classifier, as a few lines on top of mmseg's own
# config. Run with mmseg's tools/train.py; adaptive_heads must be importable (pip install adaptive-heads).
_base_ = ["mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"]

custom_imports = dict(imports=["adaptive_heads.integrations.mmseg"], allow_failed_imports=False)

model = dict(
    decode_head=dict(
        type="AdaptiveUPerHead",  # was "UPerHead": same arguments, conv_seg becomes the adaptive classifier
        adaptive=dict(type="ContextAwareClassifier", tau=15.0),  # or SSAClassifier / PrototypeClassifier
        adaptive_loss_weights=None,  # e.g. dict(distill=1.0, ce_teacher=1.0)
    )
)
