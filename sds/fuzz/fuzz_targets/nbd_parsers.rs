//! The NBD parsers on arbitrary bytes: request headers and option
//! payloads. They must never panic.

#![no_main]

use basalt_sds::nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) =
        <[u8; proto::REQUEST_LEN]>::try_from(data.get(..proto::REQUEST_LEN).unwrap_or(&[]))
    {
        if let Ok(req) = proto::Request::parse(&head) {
            assert_eq!(req.encode(), head);
        }
    }
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_request(data);
});
