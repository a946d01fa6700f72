fn main() {
    println!("I am a command, not an edgehub plugin");
}
