#[tokio::main]
async fn main() -> std::process::ExitCode {
    worker::process::main(worker::process::Build::Production).await
}
