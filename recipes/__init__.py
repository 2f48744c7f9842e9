"""Pretraining recipe parts: the LLaMA model (`recipes.model`) and the data pipeline (`recipes.data`)."""
