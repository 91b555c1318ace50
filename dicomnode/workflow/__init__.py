"""workflow stage of dicomnode."""
