"""web stage of dicomnode."""
