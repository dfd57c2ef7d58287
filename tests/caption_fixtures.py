"""A tiny random BLIP captioner built in code (a few hundred kB, no download), saved as a
transformers model folder that ``factory caption --model`` loads like any local model."""

from __future__ import annotations

from pathlib import Path

WORDS = "a the red yellow blue cup lamp apple cat on of with small large round glass photo object".split()


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), model_max_length=32)
    tokenizer.bos_token = "[CLS]"  # BLIP's decoder starts from it
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 32, "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0, "eos_token_id": 3}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "vocab.txt").unlink()
    return folder
