"""Pure text formats of the methods: question cleaning, reader passages, answer post-processing."""
