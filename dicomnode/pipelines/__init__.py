"""pipelines stage of dicomnode."""
