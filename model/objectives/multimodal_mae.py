"""Joint image and text masked autoencoding through one cross-modal decoder: M3AE (alone, raw pixels,
docs/methods/m3ae.md) and MAE-CLIP's generative terms (next to CLIP, per-patch normalized pixels,
docs/methods/mae_clip.md).

As M3AE's code: global crop 1 loses `image_mask_ratio` of its patches, the same positions in every
sample (one permutation per batch), removed before the image encoder; the caption loses the same share of its padded
length, again one permutation per batch, its masked real tokens replaced by [MASK] before the causal text encoder
(M3AE drops them from a bidirectional encoder instead). The decoder sees both and predicts the removed patches'
pixels (mean over removed patches) and the masked words (each caption's mean over its masked words, then the mean
over captions, a caption with none masked counting 0). One backward pass."""

from dataclasses import dataclass

from model.decoders import CrossModalDecoder
from model.losses import mae_loss, mlm_loss, per_caption_weights
from model.masking import MASK_ID, batch_keep_indices, mask_captions_by_count, real_token_mask
from model.objectives.masked_text import MLM_LOGIT_CHUNKS
from model.objectives.objective import MASK_NOTE, WEIGHT_NOTE, Objective, patch_grid, register
from model.ranges import ranged


@register
class MultimodalMAE(Objective):
    @dataclass
    class Settings:
        image_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
        text_mask_ratio: float = ranged(0.75, "(0, 1)", note=MASK_NOTE)
        norm_pix: bool = False  # M3AE: raw (dataset-normalized) pixels; MAE-CLIP: per-patch normalized
        decoder_width: int = ranged(512, "[1, inf)")  # the cross-modal decoder's width
        decoder_depth: int = ranged(8, "[1, inf)")  # the cross-modal decoder's blocks
        decoder_heads: int = ranged(16, "[1, inf)")  # the cross-modal decoder's attention heads
        image_weight: float = ranged(1.0, "[0, inf)", note=WEIGHT_NOTE)
        text_weight: float = ranged(0.5, "[0, inf)", note=WEIGHT_NOTE)

    name = "multimodal_mae"
    build_rank, pass_rank = 60, 90
    students = ("image_student", "text_student")
    global_views = 1

    def attention_heads(self):
        return [("decoder_heads", self.settings.decoder_heads, "model.objectives.multimodal_mae.decoder_width",
                 self.settings.decoder_width)]

    def networks(self, model):
        settings, towers = self.settings, self.model_config
        return {"multimodal_decoder": lambda: CrossModalDecoder(
            model.image_student.embed_dim, towers.text_width, patch_grid(towers), towers.patch_size, MASK_ID + 1,
            settings.decoder_width, settings.decoder_depth, settings.decoder_heads)}

    def passes(self, model, views, teacher, values):
        settings, patch_size = self.settings, self.model_config.patch_size
        crop, tokens = views["global_crops"][0], views["tokens"]  # (B, 3, H, W), (B, T)
        num_patches = (crop.shape[-2] // patch_size) * (crop.shape[-1] // patch_size)
        keep, removed = batch_keep_indices(crop.shape[0], num_patches, settings.image_mask_ratio, crop.device)
        masked_tokens, labels, masked = mask_captions_by_count(tokens, settings.text_mask_ratio)
        pixels, words = model.multimodal_decoder(model.image_student(crop, keep_indices=keep), keep, num_patches,
                                                 model.text_student(masked_tokens)[1], real_token_mask(tokens))
        image_loss, _ = mae_loss(pixels, crop, removed, patch_size, norm_pix=settings.norm_pix)
        text_loss, _ = mlm_loss(words[masked], labels[masked], model.multimodal_decoder.predict, MLM_LOGIT_CHUNKS,
                                row_weights=per_caption_weights(masked))
        loss = settings.image_weight * image_loss + settings.text_weight * text_loss
        yield loss, {"multimodal_image": image_loss.detach(), "multimodal_text": text_loss.detach(),
                     "multimodal_mae": loss.detach()}
