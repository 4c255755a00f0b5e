"""CLIPSelf: self-distillation of CLIP's dense features (``groundlabel distill``) and CLIPSelf's EVA-CLIP
checkpoints on open_clip's EVA models. Import the submodules (``distill``, ``eva``, ``cli``) directly."""
