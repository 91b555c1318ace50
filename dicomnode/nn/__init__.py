"""nn stage of dicomnode."""
