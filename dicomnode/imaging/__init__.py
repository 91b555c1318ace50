"""imaging stage of dicomnode."""
