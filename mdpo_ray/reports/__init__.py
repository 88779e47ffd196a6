"""What is read back from MLflow after runs: sweep trial tables, the Markdown/HTML report and the evidence page."""
