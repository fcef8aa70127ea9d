"""The report page (reportpage) and the PNG figures (plots) drawn for it, for MLflow runs and for exports (an
export's model card is pipeline.commands.model_card)."""
