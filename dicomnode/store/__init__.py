"""store stage of dicomnode."""
