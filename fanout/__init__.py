"""Result delivery: follows a session's results stream and hands results to sockets."""
