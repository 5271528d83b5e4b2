"""After pre-training: export to Hugging Face, fine-tuning (GLUE and custom tasks), reports."""
