"""phantoms stage of dicomnode."""
