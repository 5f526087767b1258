//! tmux source (in progress).
