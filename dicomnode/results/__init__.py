"""results stage of dicomnode."""
