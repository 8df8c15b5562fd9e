"""Input pipelines and data generators."""
