"""Joint image and text masked autoencoding through one cross-modal decoder: M3AE (alone, raw pixels,
docs/methods/m3ae.md) and MAE-CLIP's generative terms (next to CLIP, per-patch normalized pixels,
docs/methods/mae_clip.md).

As M3AE's code: global crop 1 loses `multimodal_image_mask_ratio` of its patches, the same positions in every
sample (one permutation per batch), removed before the image encoder; the caption loses the same share of its padded
length, again one permutation per batch, its masked real tokens replaced by [MASK] before the causal text encoder
(M3AE drops them from a bidirectional encoder instead). The decoder sees both and predicts the removed patches'
pixels (mean over removed patches) and the masked words (each caption's mean over its masked words, then the mean
over captions, a caption with none masked counting 0). One backward pass."""

from model.decoders import CrossModalDecoder
from model.losses import mae_loss, mlm_loss, per_caption_weights
from model.masking import MASK_ID, batch_keep_indices, mask_captions_by_count, real_token_mask
from model.objectives.masked_text import MLM_LOGIT_CHUNKS
from model.objectives.objective import Objective, register


@register
class MultimodalMAE(Objective):
    name = "multimodal_mae"
    build_rank, pass_rank = 60, 90
    students = ("image_student", "text_student")

    def networks(self, config, model):
        grid = (config.global_crop_px // config.patch_size,) * 2
        return {"multimodal_decoder": lambda: CrossModalDecoder(
            model.image_student.embed_dim, config.text_width, grid, config.patch_size, MASK_ID + 1,
            config.multimodal_decoder_width, config.multimodal_decoder_depth, config.multimodal_decoder_heads)}

    def passes(self, model, views, teacher, values):
        config, crop, tokens = self.config, views["global_crops"][0], views["tokens"]  # (B, 3, H, W), (B, T)
        num_patches = (crop.shape[-2] // config.patch_size) * (crop.shape[-1] // config.patch_size)
        keep, removed = batch_keep_indices(crop.shape[0], num_patches, config.multimodal_image_mask_ratio, crop.device)
        masked_tokens, labels, masked = mask_captions_by_count(tokens, config.multimodal_text_mask_ratio)
        pixels, words = model.multimodal_decoder(model.image_student(crop, keep_indices=keep), keep, num_patches,
                                                 model.text_student(masked_tokens)[1], real_token_mask(tokens))
        image_loss, _ = mae_loss(pixels, crop, removed, config.patch_size, norm_pix=config.multimodal_norm_pix)
        text_loss, _ = mlm_loss(words[masked], labels[masked], model.multimodal_decoder.predict, MLM_LOGIT_CHUNKS,
                                row_weights=per_caption_weights(masked))
        loss = config.multimodal_image_weight * image_loss + config.multimodal_text_weight * text_loss
        yield loss, {"multimodal_image": image_loss.detach(), "multimodal_text": text_loss.detach(),
                     "multimodal_mae": loss.detach()}
