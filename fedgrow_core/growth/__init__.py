"""The growth operators: LiGO and Dual-LiGO width/depth expansion of transformers (Wang et al., ICLR 2023).

Nothing here knows about Flower, data or clients: :mod:`~fedgrow_core.growth.shapes`
names a transformer's shape, :mod:`~fedgrow_core.growth.ligo` holds the operators,
:mod:`~fedgrow_core.growth.grown_model` trains a target model through them, and
:mod:`~fedgrow_core.growth.families` adapts BERT (transformers) and ViT (timm).
"""
