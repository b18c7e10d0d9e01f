//! The command line at its edges: datasets, the queue verbs, refusals, the
//! experiments verbs, output folders, weights, and roots written by earlier code.

mod cli_dataset;
mod cli_experiments;
mod cli_queue;
mod cli_refusals;
mod elpv_dataset;
mod existing_databases;
mod existing_root;
mod output_folders;
mod weights_fetch;
