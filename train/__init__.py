"""The train stage: LoRA / QLoRA / DoRA fine-tuning with trl's SFTTrainer + peft (see docs/training.md)."""
