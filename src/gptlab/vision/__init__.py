"""Images in the token sequence (the LLaVA design, Liu et al. 2023): a vision encoder turns an image into a
grid of feature vectors, a projector maps them to the GPT's embedding width, and those vectors take the
place of the token embeddings at an image placeholder in the prompt.

  encoder  VisionConfig, the encoders (a small CNN or ViT trained from scratch; `register_encoder` plugs in
           another, e.g. a pretrained one) and VisionTower = encoder + projector
  images   image bytes / files / data: URLs -> checked, resized pixel tensors (the bad-input rules)
  inputs   `<image>` placeholders -> token ids with image slots; splicing image embeddings into a sequence
"""

from gptlab.vision.encoder import VisionConfig, VisionTower, register_encoder
from gptlab.vision.images import ImageError, load_image
from gptlab.vision.inputs import IMAGE_PLACEHOLDER, MultimodalPrompt, encode_prompt, splice

__all__ = ["IMAGE_PLACEHOLDER", "ImageError", "MultimodalPrompt", "VisionConfig", "VisionTower", "encode_prompt",
           "load_image", "register_encoder", "splice"]
