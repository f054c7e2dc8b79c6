"""Task modules that tests run in separate worker processes."""
