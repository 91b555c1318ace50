"""net stage of dicomnode."""
