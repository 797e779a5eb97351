"""Every byte in or out: checkpoints, tokenizer files, images, downloads."""
