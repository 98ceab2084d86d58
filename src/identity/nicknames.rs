//! Built-in table of given-name equivalences: formal names, their spelling variants and their
//! common (mostly US) nicknames. Two names are equivalent when some group holds both, so "bob"
//! and "rob" are equivalent (both Robert) while "samuel" and "samantha" are not, although both
//! list "sam".

use std::collections::BTreeMap;
use std::sync::OnceLock;

/// One group per formal name. The first entry is the group's head (used in blocking keys); the
/// other formal spellings of the same name come next, then the nicknames. All entries are
/// lowercase ASCII, as produced by `normalize::name_tokens`.
#[rustfmt::skip]
const GROUPS: &[&[&str]] = &[
    &["abigail", "abbie", "abby", "abbey", "gail"],
    &["abraham", "abe", "bram"],
    &["adeline", "adaline", "addie", "addy"],
    &["adelaide", "addie", "ada"],
    &["agnes", "aggie", "nessa"],
    &["albert", "al", "bert", "bertie"],
    &["alan", "allan", "allen", "al"],
    &["alexander", "alex", "alec", "alek", "al", "xander", "sandy", "lex", "sasha", "zander"],
    &["alexandra", "alex", "alexa", "lexi", "lexie", "lexy", "sandra", "sandy", "sasha", "ally"],
    &["alexis", "alex", "lexi", "lexie"],
    &["alfred", "al", "alf", "alfie", "fred", "freddie"],
    &["alice", "alicia", "allie", "ally", "ali"],
    &["allison", "alison", "allie", "ally", "ali"],
    &["amanda", "mandy", "manda", "amy"],
    &["amelia", "millie", "amy"],
    &["andrew", "andy", "drew", "andre"],
    &["angela", "angie", "angel"],
    &["anne", "ann", "anna", "annie", "nan", "nanette", "nancy"],
    &["anthony", "antony", "tony", "ant"],
    &["antonio", "tony", "toni", "tono"],
    &["arnold", "arnie"],
    &["arthur", "art", "artie"],
    &["barbara", "barb", "barbie", "babs", "bobbie"],
    &["barnabas", "barney"],
    &["bartholomew", "bart"],
    &["beatrice", "bea", "trixie"],
    &["benjamin", "ben", "benny", "benji", "benjy"],
    &["bernard", "bernie", "barney"],
    &["beverly", "beverley", "bev"],
    &["bradley", "brad"],
    &["brandon", "brandy"],
    &["brian", "bryan", "bri"],
    &["bridget", "bridgette", "biddy", "bridie"],
    &["calvin", "cal"],
    &["cameron", "cam"],
    &["candace", "candice", "candy"],
    &["caroline", "carolina", "carrie", "carol", "lina"],
    &["carolyn", "carrie", "carol", "lyn", "lynn"],
    &["catherine", "katherine", "kathryn", "katharine", "catharine", "cathryn", "kate", "katie", "katy", "kathy", "cathy", "cat", "kat", "kit", "kitty", "kay", "trina"],
    &["kathleen", "cathleen", "kate", "katie", "kathy", "cathy", "kay", "kat"],
    &["caitlin", "kaitlyn", "katelyn", "kaitlin", "caitlyn", "kate", "katie"],
    &["cecilia", "cece", "cissy", "celia"],
    &["charles", "charlie", "chuck", "chas", "chaz", "chip", "carl"],
    &["charlotte", "charlie", "lottie", "lotte", "char"],
    &["christina", "christine", "kristina", "kristine", "chris", "chrissy", "chrissie", "tina", "kris", "christy", "kristy", "teena"],
    &["christopher", "kristopher", "chris", "kris", "kit", "topher", "chip"],
    &["christian", "chris", "kris"],
    &["cynthia", "cindy", "cyndi", "cindi"],
    &["clifford", "cliff"],
    &["clinton", "clint"],
    &["cornelius", "neil", "corny", "connie"],
    &["constance", "connie"],
    &["curtis", "curt"],
    &["daniel", "dan", "danny", "dannie"],
    &["danielle", "dani", "danni", "elle"],
    &["david", "dave", "davy", "davey", "davie"],
    &["deborah", "debra", "debbie", "debby", "deb", "debi"],
    &["delores", "dolores", "lola", "dee", "lolita"],
    &["dennis", "denis", "denny"],
    &["diana", "diane", "dianne", "di", "dee"],
    &["dominic", "dominick", "dom", "nick"],
    &["donald", "don", "donnie", "donny"],
    &["dorothy", "dot", "dottie", "dotty", "dolly", "dora"],
    &["douglas", "doug"],
    &["edward", "ed", "eddie", "eddy", "ted", "teddy", "ned"],
    &["edwin", "ed", "eddie", "win"],
    &["edmund", "edmond", "ed", "eddie", "ned"],
    &["eduardo", "ed", "eddie", "lalo"],
    &["eleanor", "elinor", "ellie", "elly", "nell", "nellie", "nora", "elle", "lenore"],
    &["elizabeth", "elisabeth", "liz", "lizzie", "lizzy", "beth", "betty", "bette", "betsy", "eliza", "libby", "liza", "lisa", "bess", "bessie", "ellie", "elsie", "lise"],
    &["emily", "emilie", "em", "emmy", "millie"],
    &["eric", "erik", "erick", "rick"],
    &["ernest", "ernie"],
    &["eugene", "gene"],
    &["evelyn", "evie", "eve", "lyn"],
    &["francis", "frank", "fran", "frankie"],
    &["frances", "fran", "frannie", "frankie", "fanny"],
    &["francisco", "frank", "paco", "pancho", "cisco", "frankie"],
    &["franklin", "frank", "frankie"],
    &["frederick", "frederic", "fredrick", "fred", "freddie", "freddy", "fritz", "rick"],
    &["gabriel", "gabe", "gabby"],
    &["gabrielle", "gabriella", "gabby", "gabi", "brie"],
    &["gerald", "jerry", "gerry"],
    &["geraldine", "gerry", "geri", "jerry"],
    &["gilbert", "gil", "bert"],
    &["gregory", "greg", "gregg"],
    &["guillermo", "memo", "will", "william"],
    &["harold", "harry", "hal"],
    &["harriet", "hattie", "hatty"],
    &["helen", "helena", "nell", "nellie", "ellie", "lena"],
    &["henry", "hank", "harry", "hal", "hen"],
    &["herbert", "herb", "bert"],
    &["howard", "howie"],
    &["ignacio", "nacho"],
    &["isabel", "isabella", "isabelle", "izzy", "bella", "isa", "belle", "izzie"],
    &["isaac", "ike"],
    &["jacob", "jake", "jakey"],
    &["jacqueline", "jackie", "jacki", "jacquie"],
    &["james", "jim", "jimmy", "jimmie", "jamie", "jem", "jimbo"],
    &["janet", "jan", "jenny", "netty"],
    &["jeffrey", "geoffrey", "jeff", "geoff", "jeffery"],
    &["jennifer", "jenifer", "jen", "jenn", "jenny", "jennie", "jenna"],
    &["jeremy", "jeremiah", "jerry", "jer"],
    &["jerome", "jerry"],
    &["jessica", "jess", "jessie", "jessi"],
    &["john", "jon", "jack", "johnny", "jonny", "jackie"],
    &["jonathan", "johnathan", "jonathon", "jon", "jonny", "johnny"],
    &["jose", "pepe", "joe"],
    &["joseph", "joe", "joey", "jos"],
    &["josephine", "jo", "josie", "fina"],
    &["joshua", "josh"],
    &["joanne", "joanna", "johanna", "joann", "jo"],
    &["judith", "judy", "judi", "jude"],
    &["julia", "julie", "jules"],
    &["julian", "jules"],
    &["kenneth", "ken", "kenny"],
    &["kimberly", "kimberley", "kim", "kimmy"],
    &["kristen", "kirsten", "kristin", "kristine", "kris", "kristy", "kirstie"],
    &["lawrence", "laurence", "larry", "laurie", "lars"],
    &["leonard", "leo", "len", "lenny", "leon"],
    &["leonardo", "leo"],
    &["lillian", "lilian", "lily", "lil", "lilly", "lillie"],
    &["louis", "luis", "lou", "louie"],
    &["louise", "louisa", "lou", "lulu"],
    &["lucas", "luke", "luca"],
    &["lucille", "lucy", "lu"],
    &["madeline", "madeleine", "madelyn", "maddie", "maddy", "madi", "madge"],
    &["manuel", "manny", "manolo"],
    &["margaret", "margarita", "margret", "maggie", "meg", "peggy", "peg", "marge", "margie", "greta", "gretchen", "madge", "daisy", "maisie", "rita", "molly"],
    &["marjorie", "margery", "marge", "margie"],
    &["martha", "marty", "mattie", "patty"],
    &["martin", "marty"],
    &["mary", "maria", "marie", "molly", "polly", "mamie", "mae", "mimi", "mari"],
    &["matilda", "mathilda", "tilly", "tillie", "mattie"],
    &["matthew", "mathew", "matt", "matty", "mat"],
    &["maxwell", "max"],
    &["maximilian", "maximillian", "max"],
    &["megan", "meghan", "meagan", "meg"],
    &["melissa", "mel", "missy", "lisa"],
    &["melvin", "mel"],
    &["michael", "micheal", "mike", "mikey", "mick", "mickey", "mikie"],
    &["michelle", "shelly", "shelley", "chelle", "mich"],
    &["mildred", "millie", "milly"],
    &["miriam", "mimi", "mitzi"],
    &["mitchell", "mitch"],
    &["montgomery", "monty"],
    &["nathan", "nate", "nat"],
    &["nathaniel", "nathanael", "nate", "nat", "nathan", "natty"],
    &["natalie", "nat", "natty", "talia"],
    &["nicholas", "nicolas", "nick", "nicky", "nico", "nik"],
    &["nicole", "nicky", "nikki", "nic", "cole", "nicki"],
    &["norman", "norm"],
    &["oliver", "ollie"],
    &["olivia", "liv", "livvy", "ollie"],
    &["pamela", "pam", "pammy"],
    &["patricia", "pat", "patty", "pattie", "patsy", "trish", "tricia", "trisha", "tisha"],
    &["patrick", "pat", "paddy", "patty"],
    &["penelope", "penny"],
    &["percival", "percy"],
    &["peter", "pete", "petey"],
    &["philip", "phillip", "phil", "pip"],
    &["priscilla", "cilla", "prissy"],
    &["rafael", "raphael", "rafa", "raf"],
    &["randolph", "randy", "dolph"],
    &["randall", "randal", "randy"],
    &["raymond", "ray"],
    &["rebecca", "rebekah", "becky", "becca", "beck", "reba"],
    &["reginald", "reg", "reggie"],
    &["richard", "rick", "ricky", "rich", "richie", "dick", "rico"],
    &["robert", "rob", "robbie", "robby", "bob", "bobby", "bert", "robin"],
    &["roberta", "bobbie", "bobbi", "robbie", "bertie"],
    &["roberto", "beto", "rob", "bob"],
    &["alberto", "beto", "al", "bert"],
    &["rodney", "rod"],
    &["roger", "rog"],
    &["ronald", "ron", "ronnie", "ronny"],
    &["rosemary", "rose", "rosie", "romy"],
    &["rosalind", "rosalyn", "roz", "rose", "rosie"],
    &["russell", "russ", "rusty"],
    &["samantha", "sam", "sammy", "sammie"],
    &["samuel", "sam", "sammy", "sammie"],
    &["sandra", "sandy", "sandi", "sandie", "sondra"],
    &["sarah", "sara", "sally", "sadie"],
    &["sebastian", "seb", "bastian"],
    &["sidney", "sydney", "sid"],
    &["solomon", "sol"],
    &["stanley", "stan"],
    &["stephanie", "stefanie", "steph", "stevie", "stef"],
    &["stephen", "steven", "stefan", "steve", "stevie"],
    &["stuart", "stewart", "stu"],
    &["susan", "suzanne", "susanne", "susanna", "sue", "susie", "suzy", "suzie"],
    &["sylvester", "sly", "vester"],
    &["tabitha", "tabby"],
    &["terrence", "terence", "terrance", "terry"],
    &["theodore", "ted", "teddy", "theo"],
    &["theresa", "teresa", "terry", "tess", "tessa", "tessie"],
    &["thaddeus", "thad", "tad"],
    &["thomas", "tom", "tommy", "thom"],
    &["timothy", "tim", "timmy"],
    &["tobias", "toby"],
    &["valerie", "val"],
    &["veronica", "ronnie", "roni", "vera"],
    &["victoria", "vicky", "vicki", "vickie", "tori", "vic"],
    &["victor", "vic", "vick"],
    &["vincent", "vince", "vinny", "vinnie", "vin"],
    &["virginia", "ginny", "ginger", "virgie"],
    &["walter", "walt", "wally"],
    &["wallace", "wally"],
    &["wilfred", "wilfried", "will", "fred"],
    &["william", "bill", "billy", "billie", "will", "willie", "willy", "liam", "wil"],
    &["winifred", "winnie", "freda"],
    &["zachary", "zachery", "zach", "zack", "zak", "zac"],
    &["enrique", "kike", "quique", "henry"],
    &["jesus", "chuy"],
    &["guadalupe", "lupe", "lupita"],
    &["concepcion", "concha", "conchita"],
    &["alejandro", "alex", "ale", "alejo"],
    &["alejandra", "alex", "ale", "sandra"],
    &["mohammed", "mohammad", "muhammad", "mohamed", "mohamad"],
    &["yolanda", "yoli"],
    &["lorraine", "lori", "laurie"],
    &["lauren", "laurie", "lori"],
    &["laura", "laurie", "lori"],
    &["ashley", "ash"],
    &["nancy", "nan", "nance"],
];

/// Name -> indices of the groups that hold it.
fn index() -> &'static BTreeMap<&'static str, Vec<usize>> {
    static INDEX: OnceLock<BTreeMap<&'static str, Vec<usize>>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut map: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
        for (i, group) in GROUPS.iter().enumerate() {
            for name in group.iter() {
                let slot = map.entry(*name).or_default();
                if !slot.contains(&i) {
                    slot.push(i);
                }
            }
        }
        map
    })
}

/// Whether two different normalized given names are nicknames or spelling variants of one
/// formal name (same name is not an alias; compare equality first).
pub fn are_aliases(a: &str, b: &str) -> bool {
    if a == b {
        return false;
    }
    let idx = index();
    match (idx.get(a), idx.get(b)) {
        (Some(ga), Some(gb)) => ga.iter().any(|g| gb.contains(g)),
        _ => false,
    }
}

/// The heads of every group that holds `name` (Bob -> robert; Al -> albert, alan, ...), or the
/// name itself when the table does not know it. Sorted and deduplicated.
pub fn heads(name: &str) -> Vec<String> {
    let mut out: Vec<String> = match index().get(name) {
        Some(groups) => groups.iter().map(|g| GROUPS[*g][0].to_string()).collect(),
        None => vec![name.to_string()],
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
pub(crate) fn entry_count() -> usize {
    index().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_lowercase_ascii_letters() {
        for group in GROUPS {
            for name in group.iter() {
                assert!(
                    name.chars().all(|c| c.is_ascii_lowercase()),
                    "bad entry {name}"
                );
            }
        }
        assert!(entry_count() >= 300, "only {} names", entry_count());
    }

    #[test]
    fn nicknames_and_spelling_variants_are_aliases() {
        let cases = [
            ("bob", "robert", true),
            ("rob", "bob", true),
            ("bill", "william", true),
            ("liz", "elizabeth", true),
            ("kate", "katherine", true),
            ("kate", "catherine", true),
            ("jim", "james", true),
            ("mike", "michael", true),
            ("steven", "stephen", true),
            ("peggy", "margaret", true),
            ("samuel", "samantha", false),
            ("katherine", "kathleen", false),
            ("christopher", "christina", false),
            ("robert", "robert", false),
            ("bob", "zelda", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(are_aliases(a, b), want, "{a} ~ {b}");
            assert_eq!(are_aliases(b, a), want, "{b} ~ {a}");
        }
    }

    #[test]
    fn heads_name_the_formal_names() {
        assert_eq!(heads("bob"), vec!["robert", "roberto"]);
        assert_eq!(heads("robert"), vec!["robert"]);
        assert_eq!(heads("zelda"), vec!["zelda"]);
        assert!(heads("al").contains(&"albert".to_string()));
        assert!(heads("al").contains(&"alan".to_string()));
    }
}
